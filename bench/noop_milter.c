/*
 * noop_milter -- a milter that does nothing, written directly on libmilter.
 *
 * It is the floor of spfmilter's benchmark: every callback is registered, so
 * the MTA sends every stage, and every callback returns SMFIS_CONTINUE.
 *
 * Usage: noop_milter [-t SECONDS] [-d LEVEL] [-c] [-p HEXFLAGS] [-m STAGE=MACROS]... SPEC
 *
 *   SPEC       libmilter socket: unix:/path, local:/path, inet:PORT@HOST, inet6:PORT@HOST
 *   -t         libmilter I/O timeout in seconds (default: libmilter's 7210)
 *   -d         libmilter debug level
 *   -c         canned mode (also NOOP_MILTER_CANNED=1): fixed verdicts and
 *              modifications so MTA-side clients can be tested against real
 *              libmilter replies; see canned_*() below.  Off by default.
 *   -p         protocol flags (SMFIP_*) to request in xxfi_negotiate, e.g.
 *              0x4002 for NOHELO|NR_MAIL; callbacks of a no-reply stage
 *              return SMFIS_NOREPLY.
 *   -m         macros to request for a stage with smfi_setsymlist, e.g.
 *              -m '2={auth_authen} i' (stage numbers are the SMFIM_* values).
 *
 * SIGTERM, SIGHUP and SIGINT stop it through libmilter's own signal thread;
 * the exit status is 0 when smfi_main() returned MI_SUCCESS.
 *
 * Build: gcc -O2 -pthread -o noop_milter bench/noop_milter.c -lmilter
 */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <arpa/inet.h>

#include <libmilter/mfapi.h>

#define NSTAGES 7

static int canned;
static unsigned long want_pflags;
static int negotiating;
static char *symlists[NSTAGES];

/* Per-connection state of canned mode. */
struct conn {
	char connect[300];
	char helo[256];
	int mode;
	int headers;
	int chunks;
	size_t bytes;
	char *echo;
};

enum { MODE_NONE, MODE_EOMREJECT, MODE_SKIP };

/* The verdict for a stage that replies, SMFIS_NOREPLY for one that does not. */
static sfsistat
cont(unsigned long nr_bit)
{
	return (want_pflags & nr_bit) ? SMFIS_NOREPLY : SMFIS_CONTINUE;
}

static struct conn *
conn_get(SMFICTX *ctx)
{
	struct conn *c = smfi_getpriv(ctx);

	if (c == NULL && canned) {
		c = calloc(1, sizeof *c);
		if (c != NULL)
			smfi_setpriv(ctx, c);
	}
	return c;
}

static void
message_reset(struct conn *c)
{
	c->mode = MODE_NONE;
	c->headers = 0;
	c->chunks = 0;
	c->bytes = 0;
	free(c->echo);
	c->echo = NULL;
}

static int
starts_with(const char *s, const char *prefix)
{
	return strncmp(s, prefix, strlen(prefix)) == 0;
}

static sfsistat
xx_negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1,
	     unsigned long f2, unsigned long f3,
	     unsigned long *pf0, unsigned long *pf1,
	     unsigned long *pf2, unsigned long *pf3)
{
	int i;

	(void) f1;
	(void) f2;
	(void) f3;
	*pf0 = canned ? (f0 & ~SMFIF_SETSYMLIST) : SMFIF_NONE;
	for (i = 0; i < NSTAGES; i++) {
		if (symlists[i] == NULL)
			continue;
		if (smfi_setsymlist(ctx, i, symlists[i]) != MI_SUCCESS)
			return SMFIS_REJECT;
		*pf0 |= SMFIF_SETSYMLIST;
	}
	*pf1 = want_pflags;
	*pf2 = 0;
	*pf3 = 0;
	return SMFIS_CONTINUE;
}

static sfsistat
xx_connect(SMFICTX *ctx, char *hostname, _SOCK_ADDR *sa)
{
	struct conn *c = conn_get(ctx);
	char addr[INET6_ADDRSTRLEN] = "";
	char family = 'U';
	unsigned port = 0;

	if (c == NULL)
		return cont(SMFIP_NR_CONN);
	if (sa != NULL && sa->sa_family == AF_INET) {
		struct sockaddr_in *sin = (struct sockaddr_in *) sa;

		family = '4';
		inet_ntop(AF_INET, &sin->sin_addr, addr, sizeof addr);
		port = ntohs(sin->sin_port);
	} else if (sa != NULL && sa->sa_family == AF_INET6) {
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *) sa;

		family = '6';
		inet_ntop(AF_INET6, &sin6->sin6_addr, addr, sizeof addr);
		port = ntohs(sin6->sin6_port);
	} else if (sa != NULL && sa->sa_family == AF_UNIX) {
		struct sockaddr_un *sun = (struct sockaddr_un *) sa;

		family = 'L';
		snprintf(addr, sizeof addr, "%.45s", sun->sun_path);
	}
	snprintf(c->connect, sizeof c->connect, "%.200s %c %s %u",
		 hostname, family, addr, port);
	return cont(SMFIP_NR_CONN);
}

static sfsistat
xx_helo(SMFICTX *ctx, char *helo)
{
	struct conn *c = conn_get(ctx);

	if (c != NULL)
		snprintf(c->helo, sizeof c->helo, "%s", helo);
	return cont(SMFIP_NR_HELO);
}

static sfsistat
xx_envfrom(SMFICTX *ctx, char **argv)
{
	struct conn *c = conn_get(ctx);
	const char *from = argv[0];

	if (c == NULL)
		return cont(SMFIP_NR_MAIL);
	message_reset(c);
	if (starts_with(from, "<reject@")) {
		smfi_setmlreply(ctx, "550", "5.7.1", "first line",
				"second line", "third line", NULL);
		return SMFIS_REJECT;
	}
	if (starts_with(from, "<tempfail@")) {
		smfi_setreply(ctx, "451", "4.7.1", "try again later");
		return SMFIS_TEMPFAIL;
	}
	if (starts_with(from, "<accept@"))
		return SMFIS_ACCEPT;
	if (starts_with(from, "<discard@"))
		return SMFIS_DISCARD;
	if (starts_with(from, "<sleep@"))
		sleep(2);
	if (starts_with(from, "<eomreject@"))
		c->mode = MODE_EOMREJECT;
	if (starts_with(from, "<skip@"))
		c->mode = MODE_SKIP;
	return cont(SMFIP_NR_MAIL);
}

static sfsistat
xx_envrcpt(SMFICTX *ctx, char **argv)
{
	if (canned && starts_with(argv[0], "<reject@"))
		return SMFIS_REJECT;
	(void) ctx;
	return cont(SMFIP_NR_RCPT);
}

static sfsistat
xx_data(SMFICTX *ctx)
{
	(void) ctx;
	return cont(SMFIP_NR_DATA);
}

static sfsistat
xx_unknown(SMFICTX *ctx, const char *cmd)
{
	(void) ctx;
	if (canned && starts_with(cmd, "REJECTME"))
		return SMFIS_REJECT;
	return cont(SMFIP_NR_UNKN);
}

static sfsistat
xx_header(SMFICTX *ctx, char *name, char *value)
{
	struct conn *c = conn_get(ctx);

	if (c != NULL) {
		c->headers++;
		if (strcasecmp(name, "X-Echo") == 0) {
			free(c->echo);
			c->echo = strdup(value);
		}
	}
	return cont(SMFIP_NR_HDR);
}

static sfsistat
xx_eoh(SMFICTX *ctx)
{
	(void) ctx;
	return cont(SMFIP_NR_EOH);
}

static sfsistat
xx_body(SMFICTX *ctx, unsigned char *chunk, size_t len)
{
	struct conn *c = conn_get(ctx);

	(void) chunk;
	if (c != NULL) {
		c->chunks++;
		c->bytes += len;
		if (c->mode == MODE_SKIP)
			return SMFIS_SKIP;
	}
	return cont(SMFIP_NR_BODY);
}

static void
canned_modifications(SMFICTX *ctx, struct conn *c)
{
	char line[128];
	const char *macro;
	static char newbody[] = "replaced body\r\n";

	smfi_addheader(ctx, "X-Noop-Connect", c->connect);
	smfi_addheader(ctx, "X-Noop-Helo", c->helo);
	snprintf(line, sizeof line, "headers=%d chunks=%d bytes=%zu",
		 c->headers, c->chunks, c->bytes);
	smfi_addheader(ctx, "X-Noop-Counts", line);
	macro = smfi_getsymval(ctx, "i");
	smfi_addheader(ctx, "X-Noop-Macro-i", (char *) (macro ? macro : "(none)"));
	macro = smfi_getsymval(ctx, "{auth_authen}");
	smfi_addheader(ctx, "X-Noop-Macro-auth",
		       (char *) (macro ? macro : "(none)"));
	if (c->echo != NULL)
		smfi_addheader(ctx, "X-Noop-Echo", c->echo);
	smfi_insheader(ctx, 1, "X-Noop-First", "inserted");
	smfi_chgheader(ctx, "Subject", 1, "changed subject");
	smfi_addrcpt(ctx, "<added@example.org>");
	smfi_addrcpt_par(ctx, "<par@example.org>", "NOTIFY=NEVER");
	smfi_delrcpt(ctx, "<gone@example.org>");
	smfi_chgfrom(ctx, "<new@example.org>", "SIZE=100");
	smfi_progress(ctx);
	smfi_replacebody(ctx, (unsigned char *) newbody, sizeof newbody - 1);
	smfi_quarantine(ctx, "held for review");
}

static sfsistat
xx_eom(SMFICTX *ctx)
{
	struct conn *c = conn_get(ctx);

	if (c == NULL)
		return SMFIS_CONTINUE;
	if (c->mode == MODE_EOMREJECT) {
		smfi_setreply(ctx, "550", "5.7.0", "rejected at end of message");
		message_reset(c);
		return SMFIS_REJECT;
	}
	canned_modifications(ctx, c);
	message_reset(c);
	return SMFIS_CONTINUE;
}

static sfsistat
xx_abort(SMFICTX *ctx)
{
	struct conn *c = smfi_getpriv(ctx);

	if (c != NULL)
		message_reset(c);
	return SMFIS_CONTINUE;
}

static sfsistat
xx_close(SMFICTX *ctx)
{
	struct conn *c = smfi_getpriv(ctx);

	if (c != NULL) {
		message_reset(c);
		free(c);
		smfi_setpriv(ctx, NULL);
	}
	return SMFIS_CONTINUE;
}

static void
usage(const char *prog)
{
	fprintf(stderr, "usage: %s [-t SECONDS] [-d LEVEL] [-c] [-p HEXFLAGS] "
		"[-m STAGE=MACROS]... SPEC\n", prog);
	exit(2);
}

int
main(int argc, char **argv)
{
	struct smfiDesc desc;
	const char *env;
	int opt, stage;
	char *end;

	env = getenv("NOOP_MILTER_CANNED");
	canned = env != NULL && *env != '\0' && strcmp(env, "0") != 0;
	while ((opt = getopt(argc, argv, "t:d:cp:m:")) != -1) {
		switch (opt) {
		case 't':
			if (smfi_settimeout(atoi(optarg)) != MI_SUCCESS)
				usage(argv[0]);
			break;
		case 'd':
			smfi_setdbg(atoi(optarg));
			break;
		case 'c':
			canned = 1;
			break;
		case 'p':
			errno = 0;
			want_pflags = strtoul(optarg, &end, 0);
			if (errno != 0 || *end != '\0')
				usage(argv[0]);
			negotiating = 1;
			break;
		case 'm':
			stage = (int) strtol(optarg, &end, 10);
			if (end == optarg || *end != '=' || stage < 0 || stage >= NSTAGES)
				usage(argv[0]);
			symlists[stage] = end + 1;
			negotiating = 1;
			break;
		default:
			usage(argv[0]);
		}
	}
	if (optind != argc - 1)
		usage(argv[0]);

	memset(&desc, 0, sizeof desc);
	desc.xxfi_name = "noop_milter";
	desc.xxfi_version = SMFI_VERSION;
	desc.xxfi_flags = canned ? (SMFI_CURR_ACTS & ~SMFIF_SETSYMLIST) : SMFIF_NONE;
	desc.xxfi_connect = xx_connect;
	desc.xxfi_helo = xx_helo;
	desc.xxfi_envfrom = xx_envfrom;
	desc.xxfi_envrcpt = xx_envrcpt;
	desc.xxfi_header = xx_header;
	desc.xxfi_eoh = xx_eoh;
	desc.xxfi_body = xx_body;
	desc.xxfi_eom = xx_eom;
	desc.xxfi_abort = xx_abort;
	desc.xxfi_close = xx_close;
	desc.xxfi_unknown = xx_unknown;
	desc.xxfi_data = xx_data;
	desc.xxfi_negotiate = negotiating ? xx_negotiate : NULL;

	if (smfi_setconn(argv[optind]) != MI_SUCCESS) {
		fprintf(stderr, "noop_milter: smfi_setconn(%s) failed\n", argv[optind]);
		return 1;
	}
	if (smfi_register(desc) != MI_SUCCESS) {
		fprintf(stderr, "noop_milter: smfi_register failed\n");
		return 1;
	}
	if (smfi_opensocket(1) != MI_SUCCESS) {
		fprintf(stderr, "noop_milter: cannot open socket %s\n", argv[optind]);
		return 1;
	}
	return smfi_main() == MI_SUCCESS ? 0 : 1;
}
