"""``python -m mome <command>`` (also the ``mome`` console script)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "info": ("mome.info", "versions, devices and which backend runs each op (and why not)"),
    "demo": ("mome.demo", "train a tiny VLMo-style model on generated image-caption pairs and report retrieval"),
    "bench": ("mome.bench", "time the ops per provider and shape, with ratios to the baselines"),
}


def _usage() -> str:
    lines = ["usage: python -m mome <command> [options]", "", "commands:"]
    lines += [f"  {name:<6} {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
