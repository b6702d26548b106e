"""Small helpers shared by tests: watching a sweep from outside, a GPU's switches on the CPU."""

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


def graph_stand_in(replayed: list):
    """``GraphedSteps._capture`` on the CPU: a closure over the same static tensors, doing what
    a captured graph does (the same launches on the same tensors); ``replayed`` receives the
    length of each capture (for a reverse pass's, as ("pull", length))."""

    class Replay:
        def __init__(self, run, m, static_in, static_out):
            self.run = lambda: run(static_in, 0, m, static_out)

        def replay(self):
            self.run()

    def capture(self, tangent, m):
        static_in, static_out = tangent.clone(), tangent.new_empty(m, *tangent.shape)
        replayed.append(m if self.method == "push" else (self.method, m))
        run = getattr(self.static, self.method)
        return Replay(run, m, static_in, static_out), static_in, static_out

    return capture


def gpu_switches(monkeypatch, replayed: list) -> None:
    """Every switch the engine throws on a GPU, thrown on the CPU: the GPU's plans (float64
    tangents through chunks of 256, the fused adjoint in float64 blocks), range checks read
    late, the cell-state scan in log2 rounds, and slices replayed from stood-in graphs
    (``replayed`` receives each capture's length)."""
    import gradscope.cudagraphs as cudagraphs
    import gradscope.engine as engine
    import gradscope.linear as linear

    monkeypatch.setattr(engine, "_on_gpu", lambda x: True)
    monkeypatch.setattr(engine, "_runs_ahead", lambda x: True)
    monkeypatch.setattr(linear, "_scan_in_rounds", lambda device: True)
    monkeypatch.setattr(cudagraphs.GraphedSteps, "_capture", graph_stand_in(replayed))
    monkeypatch.setattr(engine, "graphed_steps",
                        lambda device, method="push": cudagraphs.GraphedSteps(method))
