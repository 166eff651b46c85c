# Sources of the data area (appended to FASTML_CORE_SOURCES).
list(APPEND FASTML_CORE_SOURCES
  "${CMAKE_CURRENT_LIST_DIR}/shuffle.cpp"
  "${CMAKE_CURRENT_LIST_DIR}/gather.cpp"
  "${CMAKE_CURRENT_LIST_DIR}/buffer_pool.cpp"
  "${CMAKE_CURRENT_LIST_DIR}/loader.cpp"
  "${CMAKE_CURRENT_LIST_DIR}/parquet.cpp"
  "${CMAKE_CURRENT_LIST_DIR}/data_copy_no_cuda.cpp"
)
