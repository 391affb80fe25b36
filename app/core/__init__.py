"""Settings, security helpers and error responses shared by the API and the workers."""
