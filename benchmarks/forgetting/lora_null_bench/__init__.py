"""The forgetting benchmark behind `lora-null bench` (see benchmarks/forgetting/README.md)."""
