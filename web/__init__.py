"""cxr web: the web console and HTTP API (an app package of its own, the layer below `apps`). Research use only, not for diagnostic use."""
