#!/usr/bin/env python3
"""Writes N users, each with one standard key and one credential, as `store import` reads them.

    python3 bench/import_users.py 1000000 > /tmp/users.jsonl
    time target/release/mcp-tenant-proxy store import /tmp/users.jsonl --keys-out /tmp/keys.jsonl \
        --url postgres://USER@HOST:PORT/DB --password-file PW --master-key-file master.key

Measured (2 shared cores, load average 5-6 from other builds, PostgreSQL 15 from scripts/services,
release build, --batch 10000): 1,000,000 users with a key and a credential each in 76.1 s into
PostgreSQL (client at 11% CPU, 62 MB RSS: the server is the bottleneck), 61.7 s into SQLite (--store).
Reading them back (PgStore::open + load_snapshot, credentials decrypted): 6.7 s, 520 MB RSS.
"""
import os
import sys

n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
out = sys.stdout
for i in range(n):
    secret = os.urandom(18).hex()
    out.write(
        f'{{"id":"user-{i:07d}","keys":[{{"kind":"standard"}}],'
        f'"credentials":[{{"upstream":"github","secret":"ghp_{secret}"}}]}}\n'
    )
