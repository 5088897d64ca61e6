"""Experiments: a file of edits (a grid, a list of jobs) run resumably into a results table, on one process or
sharded over many with torchrun (`p2p run`). spec.py reads the file, runner.py runs it, batch.py packs jobs into
batches, dist.py talks to torch.distributed, measures.py holds the measurements, report.py the summary pages."""
