"""Web application: health, REST API and (later) the worklist pages."""
