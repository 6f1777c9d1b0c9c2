"""`forge`: the command for people.

    forge operator [--namespace NS ...]     run the operator (what the Helm chart's Deployment runs)
    forge train FILE.yaml [--volume CLAIM=DIR ...]   run a ForgeTraining on this machine
    forge status [NAME] [-n NS]             progress of trainings in the current cluster
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forge", description="Train your own language models on your own GPUs.")
    sub = parser.add_subparsers(dest="command", required=True)

    op = sub.add_parser("operator", help="run the Kubernetes operator")
    op.add_argument("--namespace", "-n", action="append", default=[],
                    help="watch only this namespace (repeatable); default: all namespaces")

    train = sub.add_parser("train", help="run a ForgeTraining file locally (no cluster needed)")
    train.add_argument("file", help="a ForgeTraining YAML file")
    train.add_argument("--volume", "-v", action="append", default=[], metavar="CLAIM=DIR",
                       help="where a PersistentVolumeClaim of the spec is on this machine (repeatable); "
                            "default: ./volumes/<claim>")
    train.add_argument("--prompt", default=None, help="prompt for the sample completion printed at the end")

    st = sub.add_parser("status", help="show trainings and their progress")
    st.add_argument("name", nargs="?")
    st.add_argument("--namespace", "-n", default=None)

    args = parser.parse_args(argv)
    if args.command == "operator":
        from .runner import run_operator
        return run_operator(args.namespace)
    if args.command == "train":
        from .local import train_local
        return train_local(args.file, args.volume, prompt=args.prompt)
    from .status import show_status
    return show_status(args.name, args.namespace)


if __name__ == "__main__":
    sys.exit(main())
