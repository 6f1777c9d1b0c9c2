"""`forge provenance verify DIR` and `forge provenance show DIR`: check and read an exported model's record
and the chain of base models behind it (forge_trainer.provenance holds the schema and the checks)."""

from __future__ import annotations

import sys
from datetime import datetime

from forge_trainer.provenance import ProvenanceError, chain, load_public_key, read_record, sha256_bytes, verify


def verify_command(folder: str, public_keys: list[str], check_data: bool = True, verbose: bool = False) -> int:
    """Exit 0 when every record of the chain matches its files, data, base records and signatures; else 1,
    naming the first thing that differs (2: a --public-key that cannot be read)."""
    try:
        keys = [load_public_key(k) for k in public_keys]
    except ProvenanceError as e:
        print(f"forge: {e}", file=sys.stderr)
        return 2
    result = verify(folder, keys, check_data=check_data)
    if verbose:
        for line in result.checked:
            print(f"ok  {line}")
    if not result.ok:
        print(f"forge: provenance of {folder} does not verify: {result.problem}", file=sys.stderr)
        return 1
    record, _ = read_record(folder)
    records = chain(record)
    signed = sum(1 for r in records if (r.get("signing") or {}).get("signed"))
    trust = "against the given key(s)" if keys else "with the keys the records carry (pass --public-key to " \
                                                   "require yours)"
    print(f"{folder}: provenance verified: {len(records)} record(s) in the chain "
          f"({' <- '.join(r.get('method', '?') for r in records)}), {len(result.checked)} checks, "
          f"{signed} signed ({trust})" + ("" if check_data else "; data files not checked"))
    return 0


def show_command(folder: str) -> int:
    """Print the record in ``folder`` and each base record behind it, newest first."""
    try:
        record, data = read_record(folder)
    except ProvenanceError as e:
        print(f"forge: {e}", file=sys.stderr)
        return 1
    r: dict | None = record
    header = f"{folder}  (record sha256 {sha256_bytes(data)})"
    while r is not None:
        print(header)
        print("\n".join("  " + line for line in describe(r)))
        base = r.get("base") or {}
        r = base.get("record")
        header = f"\nbase model {base.get('path')}  (record sha256 {base.get('sha256')})"
    return 0


def _duration(start: str | None, end: str | None) -> str:
    try:
        seconds = int((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds())
    except (TypeError, ValueError):
        return "?"
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _loss(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _or_dash(value) -> str:
    return "-" if value in (None, "", []) else str(value)


def describe(r: dict) -> list[str]:
    """One record, for people: run, times, image, versions, nodes, signature, config, data, files, base."""
    v, image, signing = r.get("versions") or {}, r.get("image") or {}, r.get("signing") or {}
    devices = r.get("devices") or {}
    lines = [
        f"run        {r.get('run_name')}: {r.get('method')}, {r.get('steps')} steps, {r.get('tokens_seen', 0):,} tokens, "
        f"stopped by {r.get('stop_reason')}" + (f", resumed from {r['resumed_from']}" if r.get("resumed_from") else ""),
        f"losses     train {_loss(r.get('final_train_loss'))}, validation {_loss(r.get('final_val_loss'))}",
        f"time       {r.get('started_at')} -> {r.get('ended_at')} ({_duration(r.get('started_at'), r.get('ended_at'))}), "
        f"{r.get('gpu_hours', 0):.4f} GPU-hours, {devices.get('count', r.get('world_size'))} "
        f"{devices.get('type', '?')} worker(s)",
        f"image      {image.get('reference')} (digest {_or_dash(image.get('digest'))})",
        f"versions   forge {v.get('forge')}, python {v.get('python')}, torch {v.get('torch')}, "
        f"transformers {v.get('transformers')}" + (f", cuda {v['cuda']}" if v.get("cuda") else ""),
    ]
    for n in r.get("nodes") or []:
        lines.append(f"node       {n.get('hostname')}: node {_or_dash(n.get('node'))}, region {_or_dash(n.get('region'))}, "
                     f"zone {_or_dash(n.get('zone'))}, ranks {','.join(str(x) for x in n.get('ranks') or [])}")
    lines.append("signature  " + (f"{signing.get('algorithm')}, key {signing.get('key_id')}" if signing.get("signed")
                                  else "unsigned"))
    lines.append(f"config     sha256 {r.get('config_sha256')}")
    data = r.get("data") or {}
    for s in data.get("sources") or []:
        files = s.get("files") or []
        lines.append(f"data       {s.get('name')}: {s.get('path')} ({s.get('format', '')}, {len(files)} file(s))")
        lines += [f"             {f.get('sha256')}  {f.get('path')}" for f in files[:20]]
        if len(files) > 20:
            lines.append(f"             ... and {len(files) - 20} more")
    for rel, f in sorted((r.get("files") or {}).items()):
        lines.append(f"file       {f.get('sha256')}  {rel} ({f.get('bytes', 0):,} bytes)")
    base = r.get("base")
    if base:
        what = "its record embedded" if base.get("record") else f"not a Forge model: {len(base.get('files') or {})} " \
                                                                "file hash(es)"
        lines.append(f"base       {base.get('path')} ({what})")
    return lines
