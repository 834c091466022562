"""Analysis: from finished runs (or a model) to tables, figures and choices.

- ``collect``: a sweep's run directories -> one tidy table.
- ``aggregate``: pure functions over that table.
- ``report`` (with ``objectives_report``): the figures and the Markdown answering the paper's findings.
- ``selection``: variance-based prompt selection (``em-sweep select-prompts``).
- ``skewness``: logits skewness before and after post-training (``em-sweep logits``).
"""
