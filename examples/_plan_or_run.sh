# Shared tail of the Llama-3 recipes (sourced; needs GPUS, ARGS and LAYOUT arrays):
#   PLAN=1      bash examples/<recipe>.sh [--json]   the planner's report for this exact run (no GPU needed)
#   PLAN=search bash examples/<recipe>.sh [--json]   the layouts --search ranks for it (LAYOUT is its first)
#   bash examples/<recipe>.sh                         the run (torchrun; multi-node via NNODES/NODE_RANK/MASTER_ADDR)
case "${PLAN:-}" in
  1) exec "${PYTHON:-python}" -m megatron_growloop.plan --gpus "$GPUS" "${ARGS[@]}" "${LAYOUT[@]}" "$@" ;;
  search) exec "${PYTHON:-python}" -m megatron_growloop.plan --gpus "$GPUS" "${ARGS[@]}" --search "$@" ;;
  "") ;;
  *) echo "PLAN must be 1 or search, got '$PLAN'" >&2; exit 2 ;;
esac
: "${TOKENIZER:?set TOKENIZER to a Llama-3 tokenizer (HF directory or tokenizer.json)}"
: "${DATA:?set DATA to an indexed-dataset prefix (tools/preprocess_data.py with the same tokenizer)}"
NNODES=${NNODES:-$(( GPUS / 8 ))}
torchrun --nproc_per_node 8 --nnodes "$NNODES" ${NODE_RANK:+--node_rank $NODE_RANK} \
    ${MASTER_ADDR:+--master_addr $MASTER_ADDR} ${MASTER_PORT:+--master_port $MASTER_PORT} \
    -m megatron_growloop.pretrain "${ARGS[@]}" "${LAYOUT[@]}" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" --data-path "$DATA" "$@"
