"""Bridges from other libraries to longattn's attention; each module imports its library only when
imported itself (`longattn.integrations.transformers` needs `pip install 'longattn[hf]'`)."""
