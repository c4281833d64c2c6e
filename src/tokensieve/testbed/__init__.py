"""The embedded default: a small LLaVA-architecture model trained here on the synthetic set."""
