"""Single-stream SPO: one response per prompt against a per-prompt Beta tracker. The math (`advantages`, pure), the
tracker's state (`tracker`), the offline values it starts from (`offline_values`, also `spo estimate-values
--offline`), and the method that drives them in the loop (`method`)."""
