"""Small helpers shared by the tests that watch a sweep from outside."""

import sqlite3


def count_finished(db) -> int:
    """Runs with status ok in a store that another process may be writing (0 if unreadable)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as c:
            return c.execute("SELECT COUNT(*) FROM runs WHERE status = 'ok'").fetchone()[0]
    except sqlite3.Error:
        return 0
