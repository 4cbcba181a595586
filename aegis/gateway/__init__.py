"""The aegis gateway: one OpenAI URL over the ready instances of one or more runs (control plane and proxy)."""
