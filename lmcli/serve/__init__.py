"""Everything HTTP: the api_server app (Starlette), its request and response models, and APIClient. The engine
knows nothing of this package; the terminal client and the web UI are HTTP clients only."""
