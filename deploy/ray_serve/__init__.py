"""kvserve engine replicas behind Ray Serve's HTTP proxy, with session/prefix affinity.

An ingress deployment takes every HTTP request, works out its affinity key (the `user` field, the
x-session-id header, or a hash of the prompt's first characters) and hands the request to an
engine replica through a DeploymentHandle whose custom request router sends one key to one
replica and key-less requests to the least loaded. Each engine replica runs kvserve's own FastAPI
app in-process, so the OpenAI routes, errors and SSE streaming are kvserve's code."""
