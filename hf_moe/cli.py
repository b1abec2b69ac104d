"""The `hf-moe` command."""


def main(argv=None) -> int:
    raise SystemExit("hf-moe: no subcommands yet")
