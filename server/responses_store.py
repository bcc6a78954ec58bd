"""The responses kept for `previous_response_id` and GET /v1/responses/{id}: in memory, the newest N only.

Kept for the server's lifetime (a restart forgets them) and bounded, least recently used dropped first, so
a long-running server does not grow. Each entry holds the response as sent and the whole conversation it
ended (input messages and its own output as chat messages), so a follow-up needs no chain walking.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from server.protocol import ChatMessage

MAX_STORED_RESPONSES = 1024


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the Response object as returned to the client
    conversation: list[ChatMessage]  # the messages it was given (without instructions) plus its output


class ResponseStore:
    def __init__(self, capacity: int = MAX_STORED_RESPONSES) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, entry: StoredResponse) -> None:
        with self._lock:
            self._items[entry.response["id"]] = entry
            self._items.move_to_end(entry.response["id"])
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            entry = self._items.get(response_id)
            if entry is not None:
                self._items.move_to_end(response_id)
            return entry

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._items.pop(response_id, None) is not None

    def __len__(self) -> int:
        return len(self._items)
