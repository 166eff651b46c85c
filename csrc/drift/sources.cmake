#Sources of the drift area(appended to FASTML_CORE_SOURCES).
list(APPEND FASTML_CORE_SOURCES
     "${CMAKE_CURRENT_LIST_DIR}/cuda_stub.cpp"
     "${CMAKE_CURRENT_LIST_DIR}/detectors.cpp"
     "${CMAKE_CURRENT_LIST_DIR}/feature_state.cpp"
     "${CMAKE_CURRENT_LIST_DIR}/quantile_sketch.cpp"
     "${CMAKE_CURRENT_LIST_DIR}/serialize.cpp"
     "${CMAKE_CURRENT_LIST_DIR}/two_sample.cpp")
