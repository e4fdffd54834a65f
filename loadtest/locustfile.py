"""Mixed workload for ``make load``, by weight: 90 inbox reads, 30 unread-badge polls
(``GET /v1/inbox/unread_count``: every client polls it), 9 posts, 1 follow/unfollow.

Runs against a feedsvc whose graph was made by ``feedsvc seed`` (user ids ``u0..uN-1``).
Environment: ``FEEDSVC_LOAD_USERS`` (graph size, default 100000), ``FEEDSVC_SERVICE_KEY``
and ``FEEDSVC_JWT_SECRET`` (the server's), ``FEEDSVC_LOAD_SEED``.
"""

from __future__ import annotations

import itertools
import os
import random
import uuid

from locust import FastHttpUser, between, task

from feedsvc.auth import issue_token

USERS = int(os.environ.get("FEEDSVC_LOAD_USERS", "100000"))
SERVICE_KEY = os.environ.get("FEEDSVC_SERVICE_KEY", "load-service-key")
JWT_SECRET = os.environ.get("FEEDSVC_JWT_SECRET", "load-jwt-secret-0123456789abcdef0123456789")
_rng = random.Random(int(os.environ.get("FEEDSVC_LOAD_SEED", "1")))
_ids = itertools.count()


def zipf_user(rng: random.Random) -> str:
    """Authors are drawn with the same skew as the seeded graph (popular ones post more)."""
    return f"u{min(USERS - 1, int(rng.paretovariate(1.0)) - 1)}"


class FeedUser(FastHttpUser):
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.rng = random.Random(_rng.random())
        self.me = f"u{self.rng.randrange(USERS)}"
        self.user_auth = {"Authorization": f"Bearer {issue_token(JWT_SECRET, self.me, 86_400)}"}
        self.service_auth = {"Authorization": f"Bearer {SERVICE_KEY}"}

    @task(90)
    def read_inbox(self) -> None:
        self.client.get("/v1/inbox?limit=50", headers=self.user_auth, name="GET /v1/inbox")

    @task(30)
    def unread_count(self) -> None:
        self.client.get("/v1/inbox/unread_count", headers=self.user_auth,
                        name="GET /v1/inbox/unread_count")

    @task(9)
    def post_event(self) -> None:
        body = {"event_id": f"load-{uuid.uuid4().hex}-{next(_ids)}",
                "author_id": zipf_user(self.rng), "kind": "post",
                "payload": {"text": "load test"}}
        self.client.post("/v1/events", json=body, headers=self.service_auth,
                         name="POST /v1/events")

    @task(1)
    def follow_change(self) -> None:
        author = f"u{self.rng.randrange(USERS)}"
        if author == self.me:
            return
        path = f"/v1/users/{self.me}/following/{author}"
        if self.rng.random() < 0.5:
            self.client.put(path, headers=self.service_auth, name="PUT following")
        else:
            self.client.delete(path, headers=self.service_auth, name="DELETE following")
