"""The README's PostgreSQL set-up runs twice without an error: against fake postgres tools that keep their
state in files and refuse, as the real ones do, to start a running cluster or create what exists."""

import os
import re
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

FAKES = {
    "apt-get": "exit 0",
    "su": 'exec bash -c "$3"',  # su postgres -c COMMAND
    "pg_lsclusters": '[ -f "$STATE/online" ] && echo "15 main 5432 online" || echo "15 main 5432 down"',
    "pg_ctlcluster": '[ -f "$STATE/online" ] && { echo "already running" >&2; exit 2; }\ntouch "$STATE/online"',
    "psql": """sql=${@: -1}
case $sql in
  "SELECT 1 FROM pg_roles WHERE rolname='vmoe'") [ -f "$STATE/role" ] && echo 1; exit 0 ;;
  "SELECT 1 FROM pg_database WHERE datname='vmoe_nas'") [ -f "$STATE/db" ] && echo 1; exit 0 ;;
  "CREATE ROLE"*) what=role ;;
  "CREATE DATABASE"*) what=db ;;
  *) echo "unexpected SQL: $sql" >&2; exit 3 ;;
esac
[ -f "$STATE/$what" ] && { echo "ERROR: $what already exists" >&2; exit 1; }
touch "$STATE/$what\"""",
}


def setup_steps() -> str:
    """The README's set-up commands: its PostgreSQL section's first bash block, up to the storage URL."""
    section = README.read_text().split("## Distributed studies on PostgreSQL", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return block.split("\nURL=", 1)[0]


@pytest.mark.slow
def test_the_readme_postgres_steps_run_twice(tmp_path):
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir(), state.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STATE": str(state)}
    for run in ("first", "second"):
        done = subprocess.run(["bash", "-e", "-c", setup_steps()], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and done.stderr == "", f"{run} run: {done.stderr}"
    assert sorted(p.name for p in state.iterdir()) == ["db", "online", "role"]
