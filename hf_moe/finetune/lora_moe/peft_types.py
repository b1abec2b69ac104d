"""The four PEFT types of this package, added as members of peft's closed enum `peft.utils.PeftType`.

`peft.utils.register_peft_method` only accepts names that are members of `PeftType`, and transformers'
`load_adapter` reads `config.peft_type.value`, so a plain string is not enough. The members equal and hash like the
plain strings, as peft's own members do, so adapter_config.json's `"peft_type": "MIXLORA"` finds them in peft's
mappings.
"""

from peft.utils import PeftType


def add_peft_type(name: str) -> PeftType:
    """The member `PeftType.<name>`, added if it is not there yet (idempotent).

    Sets what `Enum` lookups read: `PeftType.X`, `PeftType("X")`, `PeftType["X"]` and `list(PeftType)`.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


MIXLORA = add_peft_type("MIXLORA")
LORAMOE = add_peft_type("LORAMOE")
MOLA = add_peft_type("MOLA")
MOELORA = add_peft_type("MOELORA")
