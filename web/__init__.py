"""cxr web: the web console and HTTP API (an app, top layer). Research use only, not for diagnostic use."""
