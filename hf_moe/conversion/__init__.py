"""Converters: native MoE import/export (`native`) and dense -> MoE upcycling (`upcycle`)."""

from .upcycle import upcycle

__all__ = ["upcycle"]
