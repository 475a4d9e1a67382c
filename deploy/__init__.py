"""Running kvserve beyond one process: container images (docker/), compose with Prometheus and
Grafana (compose/), Kubernetes manifests (kubernetes/) and N engine replicas on Ray Serve
(ray_serve/). deploy imports kvserve; kvserve never imports deploy."""
