/* zeroout DEVICE OFFSET LENGTH: zeroes LENGTH bytes of DEVICE at OFFSET with the BLKZEROOUT
 * ioctl, which Linux's virtio-blk sends as WRITE_ZEROES when the device offers it. busybox
 * has no applet for it (no fallocate -z, no blkdiscard -z). Built static into the test
 * guest's initramfs by build-initramfs.sh. */
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static int parse_u64(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno != 0 || end == s || *end != '\0' || s[0] == '-')
        return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    uint64_t range[2];
    if (argc != 4 || parse_u64(argv[2], &range[0]) != 0 || parse_u64(argv[3], &range[1]) != 0) {
        fprintf(stderr, "usage: zeroout DEVICE OFFSET LENGTH\n");
        return 2;
    }
    int fd = open(argv[1], O_WRONLY);
    if (fd < 0) {
        fprintf(stderr, "zeroout: open %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    if (ioctl(fd, BLKZEROOUT, range) != 0) {
        fprintf(stderr, "zeroout: BLKZEROOUT %s %llu+%llu: %s\n", argv[1],
                (unsigned long long)range[0], (unsigned long long)range[1], strerror(errno));
        return 1;
    }
    if (close(fd) != 0) {
        fprintf(stderr, "zeroout: close %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    return 0;
}
