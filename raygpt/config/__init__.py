"""Configuration is data, never code: an experiment is a flat TOML file whose keys are the
fields of `TrainConfig` (plus an optional `[sweep]` table for `raygpt.sweep`), and every
key is also a flag (`learning_rate` is `--learning-rate`).

- train: TrainConfig, its validation and its flags;
- choices: the values a key may take, and the checks other configs share;
- io: TOML and flags into any config dataclass, typed;
- resume: what a resume may change.
"""
