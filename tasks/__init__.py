"""Downstream tasks as plain modules (no registry): each builds its examples from a corpus and says how an answer
is checked. Imported explicitly by prepare.py (to write a task's data) and sample.py (to score it)."""
