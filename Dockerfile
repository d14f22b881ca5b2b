# Grid-X local lab images (see test.sh and docker-compose.yml).
#
#   node     a worker: its own dockerd, sshd and WireGuard (wireguard-go when
#            the kernel has no module). No Python: join bundles must work
#            without it.
#   hub      node + python3, runs the checkout's gridx.py mounted read-only
#            at /opt/gridx through /usr/local/bin/gridx.
#   job-python  the lab's stand-in for python:3.11 (Debian bookworm's python3
#            is 3.11), built only when `docker pull python:3.11` fails.
#   job-jupyter  gridx-lab-jupyter:latest, the image `gridx jobs jupyter`
#            runs in the lab (Debian's Jupyter Notebook).
#
# BASE_IMAGE is debian:bookworm-slim where it can be pulled; test.sh builds
# gridx-lab-base:bookworm with debootstrap where it cannot.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS node
LABEL io.gridx.lab=1
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        docker.io wireguard-tools wireguard-go iproute2 iptables \
        openssh-server procps sudo iputils-ping ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
# - host keys are made at start (lab/entrypoint.sh), unique per container;
# - the inner engine never asks a registry for an image it has;
# - /etc/init.d/docker raises `ulimit -n 1048576` (and -u/-p unlimited) under
#   `set -e`: a container without CAP_SYS_RESOURCE cannot raise a hard limit,
#   so those lines may fail softly instead of stopping dockerd's start.
RUN rm -f /etc/ssh/ssh_host_* \
 && mkdir -p /run/sshd /etc/wireguard \
 && chmod 0700 /etc/wireguard \
 && printf '%s\n' \
        '# Grid-X lab: the inner engine never asks a registry for images.' \
        'export DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1' \
        >> /etc/default/docker \
 && sed -i -E 's#^([[:space:]]*ulimit [^|]*)$#\1 2>/dev/null || true#' /etc/init.d/docker \
 && grep -q 'ulimit -n 1048576 2>/dev/null || true' /etc/init.d/docker
# The build context is lab/ (test.sh and docker-compose.yml pass it).
COPY entrypoint.sh /usr/local/sbin/gridx-lab-entrypoint
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/sbin/gridx-lab-entrypoint"]

FROM node AS hub
LABEL io.gridx.lab=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && printf '#!/bin/sh\nexec python3 /opt/gridx/gridx.py "$@"\n' > /usr/local/bin/gridx \
 && chmod 0755 /usr/local/bin/gridx

FROM ${BASE_IMAGE} AS job-python
LABEL io.gridx.lab=1
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && ln -s python3 /usr/bin/python
CMD ["python3"]

# Jupyter where quay.io cannot be reached: `gridx jobs jupyter --image
# gridx-lab-jupyter:latest` (Debian's Jupyter Notebook 6).
FROM ${BASE_IMAGE} AS job-jupyter
LABEL io.gridx.lab=1
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends jupyter-notebook \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
WORKDIR /root
CMD ["jupyter", "notebook", "--ip=0.0.0.0", "--no-browser", "--allow-root"]
