"""How much a fine-tune forgot, with no data beside the model: texts sampled from the original model with their
log-probabilities kept (reference), and the tuned model's drift on them, KL(original ‖ tuned) per token, with the
cross-entropy rise on held-out knowledge text and the share of a question file's answers still given when there are
some (measure, answers)."""
