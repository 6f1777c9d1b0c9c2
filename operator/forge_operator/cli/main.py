"""`forge`: the command for people.

    forge operator [--namespace NS ...] [--log-format json|text] [--log-level LEVEL]
                                              run the operator (what the Helm chart's Deployment runs)
    forge train FILE.yaml [--volume CLAIM=DIR ...]   run a ForgeTraining on this machine
    forge eval FILE.yaml [--volume CLAIM=DIR ...]    run a ForgeEval's suites on this machine
    forge status [NAME] [-n NS | -A] [-o table|json|yaml] [-w]   progress of trainings, found as kubectl would
    forge logs NAME [--rank N] [-f] [--tail N] [--previous]      a worker's log (rank 0 by default)
    forge events NAME                                         what happened to a training and its workers
    forge provenance verify DIR [--public-key FILE ...] [--skip-data]   check an exported model's record chain
    forge provenance show DIR                                 print it: chain, data, hashes, nodes, times
"""

from __future__ import annotations

import argparse
import sys


def _cluster_options(p: argparse.ArgumentParser, all_namespaces: bool = False) -> None:
    """kubectl's options for finding the cluster and the namespace."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--namespace", "-n", default=None, help="default: the current context's namespace")
    if all_namespaces:
        where.add_argument("--all-namespaces", "-A", action="store_true", help="every namespace")
    p.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG, else ~/.kube/config")
    p.add_argument("--context", default=None, help="default: the kubeconfig's current context")


def _parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a misspelt or shortened option is refused, never taken for another one
    parser = argparse.ArgumentParser(prog="forge", description="Train your own language models on your own GPUs.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    op = sub.add_parser("operator", help="run the Kubernetes operator", allow_abbrev=False)
    op.add_argument("--namespace", "-n", action="append", default=[],
                    help="watch only this namespace (repeatable); default: all namespaces")
    op.add_argument("--log-format", choices=["json", "text"], default=None,
                    help="default: $FORGE_LOG_FORMAT, else text")
    op.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None,
                    help="default: $FORGE_LOG_LEVEL, else info")

    train = sub.add_parser("train", help="run a ForgeTraining file locally (no cluster needed)", allow_abbrev=False)
    train.add_argument("file", help="a ForgeTraining YAML file")
    train.add_argument("--volume", "-v", action="append", default=[], metavar="CLAIM=DIR",
                       help="where a PersistentVolumeClaim of the spec (or a reward ConfigMap, or the signing key's "
                            "Secret, by name) is on this machine (repeatable); default: ./volumes/<name>")
    train.add_argument("--prompt", default=None, help="prompt for the sample completion printed at the end")

    ev = sub.add_parser("eval", help="run a ForgeEval file locally (no cluster needed)", allow_abbrev=False)
    ev.add_argument("file", help="a ForgeEval YAML file (a model.trainingRef names a ForgeTraining in the same file)")
    ev.add_argument("--volume", "-v", action="append", default=[], metavar="CLAIM=DIR",
                    help="where a PersistentVolumeClaim of the spec is on this machine (repeatable); "
                         "default: ./volumes/<claim>")

    st = sub.add_parser("status", help="show trainings and their progress", allow_abbrev=False)
    st.add_argument("name", nargs="?", help="one training, with its conditions, restarts and last checkpoint")
    _cluster_options(st, all_namespaces=True)
    st.add_argument("--output", "-o", choices=["table", "json", "yaml"], default="table")
    st.add_argument("--watch", "-w", action="store_true", help="after listing, print each change (Ctrl-C stops)")

    logs = sub.add_parser("logs", help="print a worker's log", allow_abbrev=False)
    logs.add_argument("name", help="the training")
    logs.add_argument("--rank", type=int, default=0, help="the node rank of the worker (default 0)")
    logs.add_argument("--follow", "-f", action="store_true", help="stream the log as it grows")
    logs.add_argument("--tail", type=int, default=None, help="only the last N lines")
    logs.add_argument("--previous", "-p", action="store_true", help="the log of the container's previous run")
    _cluster_options(logs)

    events = sub.add_parser("events", help="list the events of a training and its workers", allow_abbrev=False)
    events.add_argument("name", help="the training")
    _cluster_options(events)

    prov = sub.add_parser("provenance", help="verify or show an exported model's provenance", allow_abbrev=False)
    what = prov.add_subparsers(dest="action", required=True)
    check = what.add_parser("verify", help="check the record chain against the files, data and signatures; "
                                           "exit 1 naming the first difference", allow_abbrev=False)
    check.add_argument("dir", help="an exported model's folder (with provenance.json)")
    check.add_argument("--public-key", action="append", default=[], metavar="FILE",
                       help="an Ed25519 public key (PEM or OpenSSH) every record must be signed with (repeatable)")
    check.add_argument("--skip-data", action="store_true", help="do not hash the training data files")
    check.add_argument("--verbose", action="store_true", help="list every check")
    show = what.add_parser("show", help="print the record chain readably", allow_abbrev=False)
    show.add_argument("dir", help="an exported model's folder (with provenance.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "operator":
        from .runner import run_operator
        return run_operator(args.namespace, log_format=args.log_format, log_level=args.log_level)
    if args.command == "train":
        from .local import train_local
        return train_local(args.file, args.volume, prompt=args.prompt)
    if args.command == "eval":
        from .eval_local import eval_local
        return eval_local(args.file, args.volume)
    if args.command == "provenance":
        from .provenance import show_command, verify_command
        if args.action == "show":
            return show_command(args.dir)
        return verify_command(args.dir, args.public_key, check_data=not args.skip_data, verbose=args.verbose)
    cluster = {"kubeconfig": args.kubeconfig, "context": args.context}
    if args.command == "status":
        from .status import show_status
        return show_status(args.name, args.namespace, all_namespaces=args.all_namespaces, output=args.output,
                           watch=args.watch, **cluster)
    from .logs import show_events, show_logs
    if args.command == "logs":
        return show_logs(args.name, args.namespace, rank=args.rank, follow=args.follow, tail=args.tail,
                         previous=args.previous, **cluster)
    return show_events(args.name, args.namespace, **cluster)


if __name__ == "__main__":
    sys.exit(main())
