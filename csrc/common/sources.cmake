list(APPEND FASTML_CORE_SOURCES
  "${CMAKE_CURRENT_LIST_DIR}/thread_pool.cpp"
  "${CMAKE_CURRENT_LIST_DIR}/cpu_features.cpp"
  "${CMAKE_CURRENT_LIST_DIR}/mapped_file.cpp"
  "${CMAKE_CURRENT_LIST_DIR}/checksum.cpp"
)
