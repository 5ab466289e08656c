# Ascend / HCCL environment for Ray nodes on Atlas 800T A2 servers (8 Ascend 910B NPUs, HCCS inside a
# node, RoCE between nodes). Source it before `ray start` on every node: Ray's workers inherit the
# environment of the raylet that starts them, and geneformer-ray copies every HCCL_* variable of the
# driver into the training workers' environment as well.
#
#     CLUSTER_IFNAME=enp189s0f0 source cluster/hccl_env.sh && ray start ...
#
# Each variable below says what it does and why this value. Values a site must choose come from the
# environment (CLUSTER_IFNAME, ASCEND_HOME); everything else has a default that works on Atlas 800T A2.

# -- site settings -----------------------------------------------------------------------------------
# ASCEND_HOME: where the Ascend drivers and the CANN toolkit are installed (the installer's default).
export ASCEND_HOME="${ASCEND_HOME:-/usr/local/Ascend}"
if [ ! -f "$ASCEND_HOME/ascend-toolkit/set_env.sh" ]; then
    echo "hccl_env.sh: $ASCEND_HOME/ascend-toolkit/set_env.sh not found: install the CANN toolkit for Ascend 910B," \
         "or set ASCEND_HOME to where it is installed" >&2
    return 1 2>/dev/null || exit 1
fi
# CANN's own script: LD_LIBRARY_PATH (libhccl.so, libascendcl.so), PYTHONPATH (te, hccl tools),
# ASCEND_TOOLKIT_HOME, ASCEND_OPP_PATH (operator packages). torch_npu cannot be imported without it.
# shellcheck disable=SC1091
source "$ASCEND_HOME/ascend-toolkit/set_env.sh"

# -- HCCL: collective communication ------------------------------------------------------------------
# HCCL_SOCKET_IFNAME: the network interface HCCL uses for its host-side bootstrap sockets between
# nodes. Name the private interface (the one the nodes reach each other on), never a public one.
# GLOO_SOCKET_IFNAME: the same for gloo (torch.distributed's CPU groups and Ray Train's rendezvous).
# Unset (CLUSTER_IFNAME empty), both pick an interface themselves, which is fine on one-NIC hosts.
if [ -n "${CLUSTER_IFNAME:-}" ]; then
    export HCCL_SOCKET_IFNAME="$CLUSTER_IFNAME"
    export GLOO_SOCKET_IFNAME="$CLUSTER_IFNAME"
fi
# HCCL_CONNECT_TIMEOUT (s): how long ranks wait for each other while building the communicator.
# Default 120; multi-node jobs whose workers start unevenly (image pulls, slow NFS imports) need more.
# geneformer-ray refuses to start when accelerator.timeout_s is not above this and HCCL_EXEC_TIMEOUT.
export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-600}"
# HCCL_EXEC_TIMEOUT (s): how long one collective may wait for a slow rank before HCCL reports a hang.
# Default 1836. Keep it below accelerator.timeout_s (2400 in jobs/configs), so that a hang is reported
# by HCCL, which names the rank, rather than as a generic process-group timeout.
export HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1836}"
# HCCL_BUFFSIZE (MB): the buffer of each communicator for collectives. 200 is the default and ample for
# the gradients of gf-12L-104M bucketed by DDP; raise it only if HCCL logs ask for more.
export HCCL_BUFFSIZE="${HCCL_BUFFSIZE:-200}"
# HCCL_INTRA_ROCE_ENABLE=0: inside a node the NPUs talk over HCCS (the fast on-board links), not RoCE.
export HCCL_INTRA_ROCE_ENABLE="${HCCL_INTRA_ROCE_ENABLE:-0}"

# -- torch_npu runtime -------------------------------------------------------------------------------
# TASK_QUEUE_ENABLE=1: torch_npu queues operator launches on a second thread, so Python does not wait
# for each launch (a large speed-up for small operators; torch_npu's recommended setting).
export TASK_QUEUE_ENABLE="${TASK_QUEUE_ENABLE:-1}"
# PYTORCH_NPU_ALLOC_CONF: the caching allocator grows segments instead of fragmenting memory across the
# many batch widths of length-grouped batches (the NPU counterpart of PYTORCH_CUDA_ALLOC_CONF).
export PYTORCH_NPU_ALLOC_CONF="${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}"
# ASCEND_GLOBAL_LOG_LEVEL=3: CANN logs errors only (0 debug, 1 info, 2 warning, 3 error); debug logs of
# every operator fill the disk of a long pretraining run.
export ASCEND_GLOBAL_LOG_LEVEL="${ASCEND_GLOBAL_LOG_LEVEL:-3}"
# ASCEND_SLOG_PRINT_TO_STDOUT=0: CANN logs go to ~/ascend/log, not into the job's log that Ray streams.
export ASCEND_SLOG_PRINT_TO_STDOUT="${ASCEND_SLOG_PRINT_TO_STDOUT:-0}"

# Deliberately not set here:
# - ASCEND_RT_VISIBLE_DEVICES: Ray sets it for every worker that asks for the `NPU` resource (one NPU
#   each). Setting it on the node would hide NPUs from Ray's own detection.
# - HCCL_WHITELIST_DISABLE / HCCL_WHITELIST_FILE: HCCL's trust list of peer IPs. Keep CANN's default
#   unless your security policy asks for a list; then name every node's private IP in the file.
