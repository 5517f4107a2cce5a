"""`sglbatch run`: YAML job specs streamed through the engine, resumably."""
