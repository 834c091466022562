"""Stable import path for variance-based prompt selection:
every public name of :mod:`em_sweep.analysis.selection`, where the code lives."""

from em_sweep.analysis.selection import (  # noqa: F401
    GENERATED_MARKER,
    PROMPT_CONF_DIR,
    RankedPrompt,
    SelectionError,
    build_prompt_configs,
    config_name,
    format_ranking,
    load_history,
    map_history_ids,
    parse_history,
    pool_reference,
    prompt_config_yaml,
    rank_by_variance,
    sample_correctness,
    select_prompts_command,
    usable_candidates,
    variance_table,
    write_prompt_configs,
)
