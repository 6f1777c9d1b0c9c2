"""`forge status`: the trainings of the current cluster and their progress."""

from __future__ import annotations

import sys

from ..api.base import GROUP, VERSION


def _row(o: dict) -> list[str]:
    st = o.get("status") or {}
    p = st.get("progress") or {}
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    return [o["metadata"]["namespace"], o["metadata"]["name"], st.get("phase", ""), fmt(p.get("percent"), ".1f"),
            fmt(p.get("step"), "d"), fmt(p.get("loss"), ".3f"), fmt(p.get("tokensPerSecond"), ",.0f"),
            p.get("eta", ""), str(st.get("restartCount", 0))]


def show_status(name: str | None, namespace: str | None) -> int:
    import kubernetes

    try:
        kubernetes.config.load_kube_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_incluster_config()
    api = kubernetes.client.CustomObjectsApi()
    if name:
        ns = namespace or kubernetes.config.list_kube_config_contexts()[1]["context"].get("namespace", "default")
        items = [api.get_namespaced_custom_object(GROUP, VERSION, ns, "forgetrainings", name)]
    elif namespace:
        items = api.list_namespaced_custom_object(GROUP, VERSION, namespace, "forgetrainings")["items"]
    else:
        items = api.list_cluster_custom_object(GROUP, VERSION, "forgetrainings")["items"]
    rows = [["NAMESPACE", "NAME", "PHASE", "%", "STEP", "LOSS", "TOKENS/S", "ETA", "RESTARTS"]]
    rows += [_row(o) for o in items]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if name and items:
        st = items[0].get("status") or {}
        for c in st.get("conditions") or []:
            print(f"  {c['type']}={c['status']} {c['reason']}: {c.get('message', '')}")
        for r in (st.get("restarts") or [])[-5:]:
            print(f"  restart at {r['time']}: {r['reason']}: {r.get('message', '')}")
        if st.get("lastCheckpoint"):
            ck = st["lastCheckpoint"]
            print(f"  last checkpoint: step {ck['step']} at {ck.get('path', '')}")
    sys.stdout.flush()
    return 0
