"""What the init does: the request checked and the loop set up (api), the loop over steps (loop), null bases solved
(solve) and written as LoRA factors (factors) into PEFT's layers (peft_layers), the adapter chosen and restored on
failure (adapter_scope), the checks that refuse a bad init (safeguards), and block streaming (streaming, with
block_loaders bringing each block in; phases name its stages for profilers)."""
