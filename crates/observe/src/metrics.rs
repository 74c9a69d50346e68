//! The names of the fields of a `logs/metrics.jsonl` line that more than one reader knows: here so
//! that the writer (the trainer's recipes), TensorBoard and `waypoint status` agree on them.

/// The statistics a preference recipe reports beside its loss, by TRL's names, each a mean over the
/// step's pairs: keys of `logs/metrics.jsonl`, TensorBoard's `train/<name>` tags, and what
/// `waypoint status` shows of a preference run. DPO reports the first six, ORPO all nine, in this
/// order.
pub static RECIPE_METRICS: [&str; 9] = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "nll_loss",
    "log_odds_ratio",
    "log_odds_chosen",
];
