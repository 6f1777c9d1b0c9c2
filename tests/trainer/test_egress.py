"""The trainer's egress lock: a whole run with every other outbound connection refused, and a
connection outside the policy refused with a message naming the address. Each case runs in its own
process (an audit hook cannot be removed)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "case.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT / "tests" / "trainer")


def test_a_connection_outside_the_policy_is_refused_naming_it(tmp_path):
    out = python("""
        import socket, threading, urllib.request
        from forge_trainer.runtime.egress import EgressRefused, egress_locked, policy_for

        server = socket.create_server(("127.0.0.1", 0))
        with egress_locked(policy_for(["192.0.2.7:9000"], ["http://198.51.100.9:8080/score"])):
            socket.create_connection(server.getsockname(), timeout=5).close()   # loopback: allowed
            for address in [("203.0.113.5", 443), ("192.0.2.7", 9001), ("198.51.100.9", 80)]:
                s = socket.socket()
                try:
                    s.connect(address)
                    print("CONNECTED", address)
                except EgressRefused as e:
                    print("REFUSED", e)
            try:
                urllib.request.urlopen("http://203.0.113.5/model.safetensors", timeout=5)
            except Exception as e:
                print("URLLIB", type(e).__name__, e)
        s = socket.socket(); s.settimeout(0.5)
        try:
            s.connect(("203.0.113.5", 443))   # after the run: not the lock's business
            print("UNLOCKED")
        except EgressRefused:
            print("STILL LOCKED")
        except OSError:
            print("UNLOCKED")
    """, tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert not [l for l in lines if l.startswith("CONNECTED")], out.stdout
    refused = [l for l in lines if l.startswith("REFUSED")]
    assert [l.split()[3] for l in refused] == ["203.0.113.5:443", "192.0.2.7:9001", "198.51.100.9:80"]
    assert "may connect to 192.0.2.7:9000, 198.51.100.9:8080" in refused[0]
    assert any(l.startswith("URLLIB") and "egress to 203.0.113.5:80 refused" in l for l in lines), out.stdout
    assert lines[-1] == "UNLOCKED"


def test_a_whole_training_runs_with_every_other_connection_refused(tmp_path):
    out = python(f"""
        import json, socket, sys
        sys.path.insert(0, {str(ROOT / "tests" / "trainer")!r})
        from trainer_helpers import tiny_config, write_corpus
        from pathlib import Path
        import forge_trainer
        from forge_trainer.runtime import egress

        refused = []
        original = egress._audit
        def spy(event, args):
            try:
                original(event, args)
            except egress.EgressRefused as e:
                refused.append(str(e))
                raise
        egress._audit = spy   # the hook looks the function up each time it is installed: install ours
        tmp = Path({str(tmp_path)!r})
        config = tiny_config(tmp, write_corpus(tmp / "corpus", files=4), training__budget={{"max_steps": 3}})
        assert config.egress.lock
        summary = forge_trainer.run(config)
        print(json.dumps({{"status": summary.status, "step": summary.step, "refused": refused,
                          "locked": egress._installed}}))
    """, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result == {"status": "completed", "step": 3, "refused": [], "locked": True}
