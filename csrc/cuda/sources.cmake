# CUDA sources (compiled by nvcc into the fastml_cuda target only).
list(APPEND FASTML_CUDA_SOURCES
  "${CMAKE_CURRENT_LIST_DIR}/device.cu"
  "${CMAKE_CURRENT_LIST_DIR}/drift_ingest.cu"
  "${CMAKE_CURRENT_LIST_DIR}/forest_kernels.cu"
  "${CMAKE_CURRENT_LIST_DIR}/data_copy.cu"
)
