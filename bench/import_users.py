#!/usr/bin/env python3
"""Writes N users, each with one standard key and one credential, as `store import` reads them.

    python3 bench/import_users.py 1000000 > /tmp/users.jsonl
    time target/release/mcp-tenant-proxy store import /tmp/users.jsonl --keys-out /tmp/keys.jsonl \
        --url postgres://USER@HOST:PORT/DB --password-file PW --master-key-file master.key
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
