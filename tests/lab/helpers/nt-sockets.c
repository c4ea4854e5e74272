/* Test helper: opens COUNT flows to IP:PORT, each from a new socket, one way:
 *   tcp     socket, connect, close
 *   udp     socket, connect, send, close      (connected UDP)
 *   sendto  socket, sendto, close             (unconnected UDP)
 * Built static by the lab (tests/lab/src/sockets.rs) so that it runs in a busybox container.
 * Prints the source ports it used, one per line. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static unsigned short local_port(int fd)
{
	struct sockaddr_in a;
	socklen_t n = sizeof(a);
	if (getsockname(fd, (struct sockaddr *)&a, &n) != 0)
		return 0;
	return ntohs(a.sin_port);
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: %s tcp|udp|sendto IP PORT COUNT\n", argv[0]);
		return 2;
	}
	struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
	if (inet_pton(AF_INET, argv[2], &to.sin_addr) != 1) {
		fprintf(stderr, "bad address %s\n", argv[2]);
		return 2;
	}
	int count = atoi(argv[4]);
	int tcp = strcmp(argv[1], "tcp") == 0, sendto_mode = strcmp(argv[1], "sendto") == 0;
	for (int i = 0; i < count; i++) {
		int fd = socket(AF_INET, tcp ? SOCK_STREAM : SOCK_DGRAM, 0);
		if (fd < 0) {
			perror("socket");
			return 1;
		}
		if (sendto_mode) {
			if (sendto(fd, "x\n", 2, 0, (struct sockaddr *)&to, sizeof(to)) != 2) {
				perror("sendto");
				return 1;
			}
		} else {
			if (connect(fd, (struct sockaddr *)&to, sizeof(to)) != 0) {
				perror("connect");
				return 1;
			}
			if (!tcp && send(fd, "x\n", 2, 0) != 2) {
				perror("send");
				return 1;
			}
		}
		printf("%u\n", local_port(fd));
		close(fd);
	}
	return 0;
}
