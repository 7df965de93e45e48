# bpf_object(NAME SOURCE [DEPENDS headers...])
#
# Compiles SOURCE (a .bpf.c file) with clang for the BPF target into
# ${NAME}.bpf.o and generates the libbpf skeleton ${NAME}.skel.h from it with
# `bpftool gen skeleton`. Creates an INTERFACE target ${NAME}_skel whose include
# directory holds the skeleton, so linking it is all a C++ target needs to
# embed the object.
find_program(BPF_CLANG NAMES clang clang-16 clang-15 clang-14 REQUIRED)
find_program(BPFTOOL NAMES bpftool PATHS /usr/sbin /usr/local/sbin REQUIRED)

# The uapi headers (<asm/types.h>) of the build machine's architecture.
execute_process(COMMAND ${CMAKE_C_COMPILER} -print-multiarch
                OUTPUT_VARIABLE BPF_MULTIARCH OUTPUT_STRIP_TRAILING_WHITESPACE)

function(bpf_object NAME SOURCE)
  cmake_parse_arguments(ARG "" "" "DEPENDS" ${ARGN})
  set(obj ${CMAKE_CURRENT_BINARY_DIR}/${NAME}.bpf.o)
  set(skel_dir ${CMAKE_CURRENT_BINARY_DIR}/skel)
  set(skel ${skel_dir}/${NAME}.skel.h)
  add_custom_command(
    OUTPUT ${obj}
    COMMAND ${BPF_CLANG} -target bpf -O2 -g -Wall -Werror
            -D__TARGET_ARCH_x86 -I/usr/include/${BPF_MULTIARCH}
            -I${CMAKE_CURRENT_SOURCE_DIR}
            -c ${CMAKE_CURRENT_SOURCE_DIR}/${SOURCE} -o ${obj}
    DEPENDS ${SOURCE} ${ARG_DEPENDS}
    COMMENT "BPF object ${NAME}.bpf.o"
    VERBATIM)
  add_custom_command(
    OUTPUT ${skel}
    COMMAND ${CMAKE_COMMAND} -E make_directory ${skel_dir}
    COMMAND ${BPFTOOL} gen skeleton ${obj} name ${NAME} > ${skel}
    DEPENDS ${obj}
    COMMENT "BPF skeleton ${NAME}.skel.h"
    VERBATIM)
  add_custom_target(${NAME}_skel_gen DEPENDS ${skel})
  add_library(${NAME}_skel INTERFACE)
  add_dependencies(${NAME}_skel ${NAME}_skel_gen)
  target_include_directories(${NAME}_skel INTERFACE $<BUILD_INTERFACE:${skel_dir}>)
  set_property(TARGET ${NAME}_skel PROPERTY BPF_OBJECT ${obj})
endfunction()
