"""What lands on disk: models loaded and init folders saved (saving), trained adapters exported for the original
base or merged (export), and a model kept on disk while the init streams it (disk_offload)."""
