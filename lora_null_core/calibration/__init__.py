"""Where the inputs come from: calibration sources read and chosen (sources, texts), the model's own text when none
is given and to top a short file up (own_text, selection), token batches and their distinct contexts (batches,
contexts), the pass that taps each targeted layer's input (taps), the covariances it sums (covariances, cache), and
leakage measured on them (leakage)."""
