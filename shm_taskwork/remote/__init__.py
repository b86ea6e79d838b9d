"""Beyond one host: works travel through Redis Streams (docs/contract.md
"Beyond one host: the bridge"; README "More than one host").

Bottom to top: ``scripts`` (the Redis scripts of the exactly-once
protocol), ``wake`` (a bridge's subscription to the wake-ups senders
publish), ``sender`` (``Cluster``, ``RemoteTask``, ``RemoteWork``: what a
process on any host uses to queue works onto a task of another host), then
the bridge, what runs on each host and moves works from its streams into the
local domain (the command line is ``shm-taskwork bridge``): ``bridge``
(``Bridge``, the read loop) composes its parts ``checks`` (the trust
boundary), ``status`` (its figures), ``watcher`` (the local outcomes) and
``local`` (the local add), with ``killpoints`` for fault injection.
"""
from __future__ import annotations

from .sender import (CALLBACK_NAME_MAX, DONE_TTL, FINAL, GROUP, KNOWN, LIMIT_TTL, OUTCOME_TTL,
                     PREFIX, REMOTE_MODES, TASK_NAME_MAX, WORK_ID_RE, Cluster, Keys, RemoteTask,
                     RemoteWork, check_name, check_notify, connect, default_node, work_id)

__all__ = ["CALLBACK_NAME_MAX", "DONE_TTL", "FINAL", "GROUP", "KNOWN", "LIMIT_TTL",
           "OUTCOME_TTL", "PREFIX", "REMOTE_MODES", "TASK_NAME_MAX", "WORK_ID_RE", "Cluster", "Keys",
           "RemoteTask", "RemoteWork", "check_name", "check_notify", "connect",
           "default_node", "work_id"]
