"""`forge`: the command for people.

    forge operator [--namespace NS ...]     run the operator (what the Helm chart's Deployment runs)
    forge train FILE.yaml [--volume CLAIM=DIR ...]   run a ForgeTraining on this machine
    forge status [NAME] [-n NS | -A] [-o table|json|yaml]   progress of trainings, found as kubectl would
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    # allow_abbrev=False: a misspelt or shortened option is refused, never taken for another one
    parser = argparse.ArgumentParser(prog="forge", description="Train your own language models on your own GPUs.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    op = sub.add_parser("operator", help="run the Kubernetes operator", allow_abbrev=False)
    op.add_argument("--namespace", "-n", action="append", default=[],
                    help="watch only this namespace (repeatable); default: all namespaces")

    train = sub.add_parser("train", help="run a ForgeTraining file locally (no cluster needed)", allow_abbrev=False)
    train.add_argument("file", help="a ForgeTraining YAML file")
    train.add_argument("--volume", "-v", action="append", default=[], metavar="CLAIM=DIR",
                       help="where a PersistentVolumeClaim of the spec is on this machine (repeatable); "
                            "default: ./volumes/<claim>")
    train.add_argument("--prompt", default=None, help="prompt for the sample completion printed at the end")

    st = sub.add_parser("status", help="show trainings and their progress", allow_abbrev=False)
    st.add_argument("name", nargs="?", help="one training, with its conditions, restarts and last checkpoint")
    where = st.add_mutually_exclusive_group()
    where.add_argument("--namespace", "-n", default=None, help="default: the current context's namespace")
    where.add_argument("--all-namespaces", "-A", action="store_true", help="trainings of every namespace")
    st.add_argument("--output", "-o", choices=["table", "json", "yaml"], default="table")
    st.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG, else ~/.kube/config")
    st.add_argument("--context", default=None, help="default: the kubeconfig's current context")

    args = parser.parse_args(argv)
    if args.command == "operator":
        from .runner import run_operator
        return run_operator(args.namespace)
    if args.command == "train":
        from .local import train_local
        return train_local(args.file, args.volume, prompt=args.prompt)
    from .status import show_status
    return show_status(args.name, args.namespace, all_namespaces=args.all_namespaces, output=args.output,
                       kubeconfig=args.kubeconfig, context=args.context)


if __name__ == "__main__":
    sys.exit(main())
