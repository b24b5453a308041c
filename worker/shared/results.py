"""The worker's result backend: Celery's Redis backend with one atomic, final store.

Celery stores a result by reading the current one (to keep a SUCCESS from being overwritten),
then writing and publishing it: two round trips and a decode on every request's thread. Here
one script does all three, and keeps any final result (answer or failure), not only SUCCESS,
so no later copy of a task can overwrite what its caller may already have seen.
"""

from __future__ import annotations

from typing import Any

from celery.backends.base import BackendStoreError

from producer._celeryconf import SendOnlyResults

# KEYS: the result key. ARGV: the encoded meta, expiry in seconds (0: none).
_STORE_LUA = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' then
    local status = meta['status']
    if status == 'SUCCESS' or status == 'FAILURE' or status == 'REVOKED' then return 0 end
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


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
