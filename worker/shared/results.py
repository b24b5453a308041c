"""The worker's result backend: Celery's Redis backend with one atomic, final store.

Celery stores a result by reading the current one (to keep a SUCCESS from being overwritten),
then writing and publishing it: two round trips and a decode on every request's thread. Here
one script does all three, and keeps any final result (answer or failure), not only SUCCESS,
so no later copy of a task can overwrite what its caller may already have seen.

A batched answer is stored earlier still: the script that settles a batch
(:mod:`worker.shared.settle`) writes each leading request's result with the same final-store
function, so its caller hears the answer without waiting for the task's thread, and the task
then skips its own store (:func:`stored_by_settle`): one round trip less on every request.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import states
from celery.backends.base import BackendStoreError, KeyValueStoreBackend

from producer._celeryconf import SendOnlyResults

RESULT_PREFIX = str(KeyValueStoreBackend.task_keyprefix)

# A Lua function: store ``meta`` under ``key`` (and publish it) unless a final result is
# there; true when it stored. Shared by the backend's script and the settle script.
STORE_FINAL_LUA = """
local function store_final(key, meta, expires)
  local current = redis.call('GET', key)
  if current then
    local ok, old = pcall(cjson.decode, current)
    if ok and type(old) == 'table' then
      local status = old['status']
      if status == 'SUCCESS' or status == 'FAILURE' or status == 'REVOKED' then return false end
    end
  end
  if expires > 0 then
    redis.call('SET', key, meta, 'EX', expires)
  else
    redis.call('SET', key, meta)
  end
  redis.call('PUBLISH', key, meta)
  return true
end
"""

# KEYS: the result key. ARGV: the encoded meta, expiry in seconds (0: none).
_STORE_LUA = (
    STORE_FINAL_LUA + "return store_final(KEYS[1], ARGV[1], tonumber(ARGV[2])) and 1 or 0\n"
)


_settled = threading.local()


def stored_by_settle(task_id: str) -> None:
    """The settle script stored this task's answer: its thread's SUCCESS store is a no-op."""
    _settled.task_id = task_id


def _take_settled(task_id: str) -> bool:
    taken = getattr(_settled, "task_id", None) == task_id
    _settled.task_id = None
    return taken


class FinalResults(SendOnlyResults):
    """Select with ``result_backend = "worker.shared.results:FinalResults+redis://…"``.

    Send-only as well: the reaper re-sends requests from here, and nobody here waits on them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._store_script: Any = None

    def _store_result(
        self,
        task_id: Any,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        if _take_settled(str(task_id)) and state == states.SUCCESS:
            return result
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = task_id.decode() if isinstance(task_id, bytes) else str(task_id)
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError(
                "value too large for Redis backend", state=state, task_id=task_id
            )
        self.ensure(self._store_once, (self.get_key_for_task(task_id), value))
        return result

    def _store_once(self, key: str, value: Any) -> None:
        if self._store_script is None:
            self._store_script = self.client.register_script(_STORE_LUA)
        self._store_script(keys=[key], args=[value, int(self.expires or 0)])
