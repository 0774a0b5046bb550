# Every btx target compiles warning-clean with -Wall -Wextra (CUDA host code included).
add_compile_options($<$<COMPILE_LANGUAGE:C,CXX>:-Wall> $<$<COMPILE_LANGUAGE:C,CXX>:-Wextra>)
