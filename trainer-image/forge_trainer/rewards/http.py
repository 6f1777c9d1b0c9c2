"""A reward computed by a service: POST the batch as JSON, read one score per completion."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from ..config import HttpReward
from .scoring import RewardError

log = logging.getLogger(__name__)

BACKOFF_SECONDS = 1.0
"""Before the first retry; doubled before each further one."""


def http_reward(name: str, c: HttpReward, backoff: float = BACKOFF_SECONDS) -> Callable:
    def score(prompts, completions, **columns):
        body = json.dumps({"prompts": prompts, "completions": completions, **columns}).encode()
        errors = []
        for attempt in range(c.retries + 1):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                return _scores(_post(c.url, body, c.timeout_seconds))
            except RewardError as e:
                raise RewardError(f"reward {name!r}: {e.args[0]}") from None
            except _Retryable as e:
                errors.append(str(e))
                log.warning("reward %r: %s (attempt %d of %d)", name, e, attempt + 1, c.retries + 1)
        raise RewardError(f"reward {name!r}: POST {c.url} failed after {c.retries + 1} attempt(s): {errors[-1]}")

    return score


class _Retryable(Exception):
    pass


def _post(url: str, body: bytes, timeout: float):
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code == 429:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from None
        raise RewardError(f"POST {url}: HTTP {e.code} {e.reason}: {e.read()[:200].decode(errors='replace')}") from None
    except (TimeoutError, OSError) as e:  # refused, unreachable, timed out (URLError is an OSError)
        reason = getattr(e, "reason", e)
        raise _Retryable(f"timed out after {timeout:g}s" if isinstance(reason, TimeoutError) or "timed out" in str(reason)
                         else f"{type(reason).__name__}: {reason}") from None
    except ValueError as e:
        raise RewardError(f"POST {url}: the answer is not JSON: {e}") from None


def _scores(doc):
    if isinstance(doc, dict) and "scores" in doc:
        return doc["scores"]
    return doc
